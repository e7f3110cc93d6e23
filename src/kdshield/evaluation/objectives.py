"""What a search can optimise: each ``--objective`` names its metrics and their directions."""

OBJECTIVES = {  # name -> (metrics, modes)
    "defender": (["defender_score"], ["max"]),
    "asr": (["asr"], ["min"]),
    "cacc": (["cacc"], ["max"]),
    "asr+cacc": (["asr", "cacc"], ["min", "max"]),
    "canary": (["canary_score"], ["max"]),
}
SCALAR_MODES = {"defender_score": "max", "asr": "min", "cacc": "max", "canary_score": "max"}

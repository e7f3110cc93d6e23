"""Ray clusters: connecting (a local instance by default), resource plans, deployable configs,
multi-node and autoscaling clusters on one machine for tests and experiments."""

from kdshield.cluster.connect import connect, default_env, ordered_data, started_local
from kdshield.cluster.plan import NodeResources, ResourcePlan, cluster_nodes, detect_autoscaler, plan_resources

__all__ = ["connect", "default_env", "ordered_data", "started_local", "plan_resources", "ResourcePlan", "NodeResources",
           "cluster_nodes", "detect_autoscaler"]

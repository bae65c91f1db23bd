"""Stage 4, the rollout: how a Plan runs on Ray Serve: its deployments, the order in which replicas start and scale,
which Ray node each
plan node is, and whether Ray put every replica where the plan did. Pure functions of plain values; ``serve/``
feeds them what Ray reports (docs/ray-gpu-fractions.md has the measurements behind each rule).

- **One deployment per (model, node, fraction).** Ray Serve gives every replica of a deployment one ``num_gpus``,
  while the plan's fraction depends on the GPU a replica is planned on. So each model gets one deployment per node it
  is planned on, whose ``num_gpus`` is the plan's fraction for that node's GPUs and whose label selector pins it to
  that node (:func:`rollout_from_plan`, :func:`bind_nodes`). Its ``max_replicas`` is the plan's count there.
- **Ray picks the GPU, in arrival order.** Within a node Ray puts a fractional request on the GPU with the least room
  that holds it (best fit, ties to the lowest index; :func:`best_fit`). The fractions keep memory safe whatever Ray
  picks, but the order matters for what still fits: with two GPUs planned as {0.6, 0.4} each, the arrivals 0.4, 0.4,
  0.6, 0.6 put both 0.4s on GPU 0 and leave the second 0.6 pending. :func:`decide_scale` starts a replica on a node
  only when *every* order in which that node's starting replicas can reach Ray lands each of them and leaves the
  node's other planned replicas an order that still fits (:func:`node_gate`). Replicas of one deployment are
  interchangeable, so a node whose starting replicas all belong to one deployment is always safe.
- **A model scales over its slots in a fixed order.** :func:`fill_order`: round-robin over the nodes the model is
  planned on, the node with the most planned replicas first (ties: the node name), GPU slots before split GPU+CPU
  slots before CPU slots; the first ``min_replicas`` slots always run, load adds the next slots and scale-down
  releases the last ones first. A slot whose node gate is closed is skipped for the next one, never forced.

The stage, one room per idea: deployments (the plan as Serve deployments and their options), gate (Ray's GPU choice
and the node gate), policy (the scaling rule, pure and small), scale (one decision for every deployment), realize
(what runs of the plan), routing, binding (Ray node <-> plan node), verify (where Ray put the replicas).

May import: planner.placement (the Plan), planner.errors, planner.units, and itself.
"""

from planner.rollout.deployments import (CPU_REPLICA_CPUS, GPU_REPLICA_CPUS, GPUPLAN_NODE_LABEL,  # noqa: F401
                                         GRACEFUL_SHUTDOWN_S, KIND_RANK, POLICY, RAY_NODE_ID_LABEL, DeploymentSpec,
                                         ModelRule, NodeLayout, Rollout, deployment_options, fill_order,
                                         rollout_from_plan)
from planner.rollout.gate import GHOST_S, best_fit, completion_order, no_regret, node_gate  # noqa: F401
from planner.rollout.policy import desired_replicas, move_goal  # noqa: F401
from planner.rollout.scale import (DeploymentObs, Ghost, ModelScale, ScaleDecision, ScaleMemory,  # noqa: F401
                                   applied, decide_scale, observe)
from planner.rollout.realize import bring_up, realize  # noqa: F401
from planner.rollout.routing import PrefixIndex, pick_by_prefix, pick_deployment, prefix_hashes  # noqa: F401
from planner.rollout.binding import NodeBinding, RayNode, bind_nodes  # noqa: F401
from planner.rollout.verify import ReplicaReport, placements  # noqa: F401

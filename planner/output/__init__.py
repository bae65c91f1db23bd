"""Stage 6, output: a plan for people and for machines: text tables and SVG pictures (plan_report), the per-replica
estimate report (report), KubeRay RayService manifests (kuberay).

May import: every stage below it (model, cluster, config, placement, decisions, rollout, planning), never the CLI."""

"""The autoscaling policy every gpuplan deployment carries (``autoscaling_config.policy``).

Ray Serve pickles this module by value into its controller, so it holds no state: the call imports
``serve.app.scale_board``, the one board all of an app's deployments share there.
"""

from __future__ import annotations


class PlanPolicy:
    """Serve custom autoscaling policy (class form, built once per deployment with ``policy_kwargs``)."""

    def __init__(self, plan_id: str):
        self.plan_id = plan_id

    def __call__(self, ctx):
        from serve.app import scale_board  # imported, not pickled: one board for every deployment of the plan

        return scale_board.decide(self.plan_id, ctx)

"""Stage 3 of serve/, the Ray Serve application (``import_path: serve.app:build_app``): the builder that plans and
binds nodes (build), the HTTP ingress that routes over a model's deployments (ingress), one model replica (replica),
the book of what replicas report (registry), the autoscaling policy glue and the board it reads (autoscale,
scale_board), and the probe of Ray's nodes (inventory). Thin Ray glue: every decision is in planner/.
May import serve.engines, serve.api, serve.types, serve.trace and planner."""


def build_app(args: dict):
    """Ray Serve application builder (serve/app/build.py); imported here so the import path stays short."""
    from serve.app.build import build_app as build

    return build(args)

"""``python -m serve.run deploy.yaml`` (what `make run` calls): serve/run/main.py."""

import sys

from serve.run.main import main

sys.exit(main())

"""Stage 4 of serve/, the process lifecycle: `make run` (main: preflight, one supervisor, a clean stop), the
supervisor that outlives a SIGKILLed wrapper and stops what it started (supervisor), and the run records both read
(lifecycle). May import serve.app's builder only by its import path (a Serve config), nothing else of serve/."""

"""`python -m medvqa` is the `medvqa` command (also under `accelerate launch -m medvqa`)."""

from medvqa.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

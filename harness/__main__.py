"""`python -m medvqa` is the `medvqa` command (also under `accelerate launch -m medvqa`)."""

from medvqa.cli import exit_process, main

if __name__ == "__main__":
    exit_process(main())

"""Data-efficiency sweeps: trainer × fraction × seed, then eval of every checkpoint on every benchmark.

A layer above the core (like `medvqa.commands`): it orchestrates trainers, evals and the report, so
the core never imports `medvqa.reports`. One module per concern:

```
config.py     the sweep TOML: one dataclass per table, each validating its own values
plan.py       the jobs and their keys; every job's full settings checked before any runs
made.py       what a [[prepare]] step made: its path and the digest its readers' keys hold
state.py      done/started markers and the lock under <out>/.sweep/
executors/    where jobs run: local processes (forked from a preloaded zygote), or SLURM jobs (submitit)
run.py        the scheduler (dependencies, priorities, resume) and the report at the end
```

A sweep is a list of jobs, each an ordinary `medvqa` command in its own process (forked from a
zygote that imported torch, transformers and trl once, `executors/preload.py`; a multi-GPU user sets
a launcher such as `accelerate launch --num_processes 8 -m medvqa`, which runs as a subprocess):

```
prepare   medvqa data phantom / model init-tiny ...        (optional set-up steps of the config)
base      medvqa train --trainer align ...                 (optional shared base step)
train     medvqa train --trainer T --fraction F --seed S   -> <out>/<T>/f<F>/s<S>/checkpoint/
eval      medvqa eval --model hf:<checkpoint> ...          -> <out>/<T>/f<F>/s<S>/eval/<benchmark>/
reference medvqa eval --model <spec> ...                   -> <out>/reference/<slug>/eval/<benchmark>/
report    (in process) results.csv, data_efficiency.{md,csv,png} under <out>/report/
```

Resumability: a job that finishes writes a done-marker (`<out>/.sweep/done/<job>.json`) holding its
key — the hash of its command, of the keys of the jobs it depends on, of the digest of what the
[[prepare]] steps it reads made, and for training of the data manifest hash of its fraction. A job whose marker has the same key (and whose outputs exist, with
the same manifest hash in `checkpoint.json`) is skipped; anything else is (re)run, and `medvqa
train`/`medvqa eval` resume their own partial work. So `kill -9` at any moment and a rerun gives
the same `results.csv` as an uninterrupted run. One sweep at a time per folder (an flock).
"""

from medvqa.sweeps.config import SweepConfig, load_config, settings_toml
from medvqa.sweeps.plan import Job
from medvqa.sweeps.run import Sweep, run_sweep

__all__ = ["Job", "Sweep", "SweepConfig", "load_config", "run_sweep", "settings_toml"]

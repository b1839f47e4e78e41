"""One eval as three steps with files in between, each rerunnable alone (the lmms-eval shape).

- `plan`: what to run, decided without a model — the benchmark's questions (and the records it
  skipped), the prompt policy, the decoding settings, the scoring options and the run folder.
- `generate`: the model answers the plan's questions into `predictions.jsonl` (appended and
  flushed per batch, resumable, sharded across ranks under accelerate).
- `score`: `scores.json` + `scored.jsonl` from `predictions.jsonl` and the plan alone.

`medvqa.evaluate.evaluate` runs them in order; `runfiles` names the files they share.
"""

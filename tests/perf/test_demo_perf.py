"""`medvqa demo --preset smoke`, one round, wall time (budget ≤ 90 s on a 2-core CPU).

The whole demo path — Phantom, tiny model, align, SFT at two fractions, STLLaVA-Med, eval, report —
as a user runs it, from an empty folder. The default preset (budget ≤ 10 minutes) is measured the
same way by hand: `time medvqa demo`; its figure is in the README.
"""

from __future__ import annotations

import shutil
import subprocess
import sys


def test_demo_smoke_wall_time(benchmark, tmp_path):
    out = tmp_path / "demo-smoke"

    def demo():
        shutil.rmtree(out, ignore_errors=True)
        return subprocess.run(
            [sys.executable, "-m", "medvqa.cli", "demo", "--preset", "smoke", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )

    proc = benchmark.pedantic(demo, rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| sft@1.0 |" in proc.stdout and "| stllava-med@0.25 |" in proc.stdout
    assert (out / "report" / "data_efficiency.png").is_file()
    benchmark.extra_info["wall_s"] = round(benchmark.stats.stats.max, 1)

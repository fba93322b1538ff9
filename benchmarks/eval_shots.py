"""CPU time of one sim_tiny run (train + evaluate) at ``eval.shot_nums=[2]`` vs the default ``[1, 2, 3, 4]``, and
that the trained shot's metrics do not move. ``python benchmarks/eval_shots.py`` (each setting twice; the first
pass also generates the world)."""

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from paths import compose_cfg  # noqa: E402

from leverplus.pipeline import load_data, train_and_evaluate  # noqa: E402

root = Path(tempfile.mkdtemp(prefix="eval-shots-"))
base = ["data=sim_tiny", "rce.epochs=1", "sft.epochs=1", "model.hidden_dim=32", "tracking.enabled=false",
        f"data.cache_dir={root / 'cache'}", "plot_curves=false", "checkpoint_every_epoch=false",
        f"output_dir={root / 'out'}"]
for shots in ("[2]", "[1,2,3,4]", "[2]", "[1,2,3,4]"):
    cfg = compose_cfg(base + [f"eval.shot_nums={shots}"])
    data = load_data(cfg)
    t = time.process_time()
    out = train_and_evaluate(cfg, data, root / "out", say=lambda s: None)
    print(f"eval.shot_nums={shots}: cpu {time.process_time() - t:.2f} s, val/downstream_acc "
          f"{out.metrics['val/downstream_acc']:.4f}, test/downstream_acc {out.metrics['test/downstream_acc']:.4f}",
          flush=True)

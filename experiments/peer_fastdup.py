"""fastdup's groups of a benchmark's photos, for ``convlad eval --groups --peer``: a peer to measure
against, never a dependency (its licence is non-commercial).

fastdup 2.54 is installed into a venv of its own (``--venv``; its model ships in the wheel, so it
runs offline), and run once per ``ccthreshold`` with its own embedded model and its defaults
otherwise (``nearest_neighbors_k`` 2, exact neighbours). Its connected components are written, a
label per database photo, to a JSON file that ``eval --groups --peer`` chooses among by the same
group-wise K-fold as every other candidate:

    python experiments/peer_fastdup.py ../shared/data/mvbench-dev --out /tmp/fastdup-dev.json
    convlad eval mvbench ../shared/data/mvbench-dev --train ../shared/data/mvbench-train --groups \\
        --peer /tmp/fastdup-dev.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = r"""
import json, os, sys
import pandas as pd
import fastdup
files, work, t = sys.argv[1], sys.argv[2], float(sys.argv[3])
fastdup.run(input_dir=files, work_dir=work, turi_param=f"nnmodel=0,ccthreshold={t}", threshold=min(t, 0.9),
            verbose=False)
names = pd.read_csv(os.path.join(work, "atrain_features.dat.csv"))
cc = pd.read_csv(os.path.join(work, "connected_components.csv"))
got = dict(zip(names["index"], names["filename"]))
print(json.dumps({got[i]: int(c) for i, c in zip(cc["__id"], cc["component_id"]) if i in got}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench", type=Path, help="a benchmark folder in the mvbench layout")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "fastdup-venv")
    ap.add_argument("--thresholds", default="0.7,0.75,0.8,0.825,0.85,0.875,0.9,0.925,0.95,0.96")
    a = ap.parse_args()
    from convlad.study.datasets import load_groups

    paths = load_groups(a.bench).paths
    py = a.venv / "bin" / "python"
    if not py.exists():
        print(f"installing fastdup 2.54 into {a.venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(a.venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "fastdup==2.54"], check=True)
    version = subprocess.run([str(py), "-c", "import fastdup; print(fastdup.__version__)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    out = {"peer": f"fastdup {version}", "model": "its embedded model, defaults but ccthreshold",
           "paths": paths, "candidates": {}}
    env = dict(os.environ, SENTRY_OPT_OUT="1")
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp) / "files.txt"
        files.write_text("\n".join(paths) + "\n")
        for t in [float(x) for x in a.thresholds.split(",")]:
            work = Path(tmp) / f"work-{t}"
            run = subprocess.run([str(py), "-c", RUN, str(files), str(work), str(t)], env=env, capture_output=True,
                                 text=True)
            if run.returncode:
                sys.exit(f"fastdup at ccthreshold {t} failed: {run.stderr.strip().splitlines()[-1:]}")
            comp = json.loads(run.stdout.strip().splitlines()[-1])
            # a photo fastdup left out (unreadable to it) is a group of its own
            out["candidates"][f"ccthreshold={t:g}"] = [f"c{comp[p]}" if p in comp else f"alone {k}"
                                                       for k, p in enumerate(paths)]
            sizes = {}
            for lab in out["candidates"][f"ccthreshold={t:g}"]:
                sizes[lab] = sizes.get(lab, 0) + 1
            print(f"ccthreshold {t:g}: {sum(1 for s in sizes.values() if s > 1)} groups of 2 or more", file=sys.stderr)
    a.out.write_text(json.dumps(out))
    print(a.out)


if __name__ == "__main__":
    main()

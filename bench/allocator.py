"""What the allocator tuning of the ``headscope`` command buys (headscope.allocator): the same forward
passes on the default model in two fresh interpreters, glibc's defaults vs tuned, one after the other.

    python bench/allocator.py [--batches 4]

The workload is that of mining and of the lens/SAE evaluations: per batch of 16 × 128 corpus tokens, a pass
to the last layer reading three MLP layers, and a full pass with log-probabilities on the first 64 tokens.
Prints wall, user and system seconds and minor page faults of each, and the ratio of the walls. On this
workload the tuning does not change the wall time (README); where it pays is the lens stages' big logit
blocks (see headscope.allocator)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

WORK = """
import json, resource, sys, time
from headscope.allocator import tune_allocator
tuned = tune_allocator()
from headscope.capture import capture
from headscope.data import TokenCorpus
from headscope.models.load import load_model
m = load_model("default")
tc = TokenCorpus(m, "default", seq_len=128, progress=False)
bs = list(tc.batches("train", batch_size=16, max_tokens=16 * 128 * int(sys.argv[1])))
capture(m, bs[0], layers=[27, 28, 29], what={"mlp_post"}, stop_after=29)   # warm-up
t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for b in bs:
    capture(m, b, layers=[27, 28, 29], what={"mlp_post"}, stop_after=29)
    capture(m, b[:, :64], layers=[], what={"logprobs"})
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"tuned": tuned, "wall": time.perf_counter() - t, "user": r1.ru_utime - r0.ru_utime,
                  "sys": r1.ru_stime - r0.ru_stime, "minflt": r1.ru_minflt - r0.ru_minflt}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=4)
    a = ap.parse_args()
    res = {}
    for name, value in (("glibc defaults", "default"), ("tuned", "")):
        out = subprocess.run([sys.executable, "-c", WORK, str(a.batches)], env={**os.environ, "HEADSCOPE_MALLOC": value},
                             capture_output=True, text=True, check=True)
        res[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = res[name]
        print(f"{name:15s} wall {r['wall']:6.2f} s  user {r['user']:6.2f} s  sys {r['sys']:5.2f} s  "
              f"minor faults {r['minflt']}")
    print(f"tuned / defaults: wall {res['tuned']['wall'] / res['glibc defaults']['wall']:.2f}×, "
          f"page faults {res['tuned']['minflt'] / max(1, res['glibc defaults']['minflt']):.3f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())

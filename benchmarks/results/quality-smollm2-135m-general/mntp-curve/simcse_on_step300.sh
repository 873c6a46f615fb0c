#!/usr/bin/env bash
# Row (h) again, on the 300-step general MNTP adapter of this folder's curve (outputs/mntp-curve-general/run,
# left by `python benchmarks/mntp_curve.py ... --out benchmarks/results/quality-smollm2-135m-general/mntp-curve`):
# general-simcse.yaml unchanged (125 steps, last adapter handed on), then scored on all of STS-B test and on its
# news pairs. Run from the repository root, alone on the machine; writes simcse_on_step300.json beside this file.
set -euo pipefail
here=benchmarks/results/quality-smollm2-135m-general/mntp-curve
run=outputs/simcse-on-mntp300
mntp=outputs/mntp-curve-general/run/adapter
test -f "$mntp/adapter_config.json" || { echo "error: $mntp: run benchmarks/mntp_curve.py first (see the header)" >&2; exit 2; }
t0=$(date +%s)
python -m deepspeed.launcher.runner --num_gpus 2 --master_port "$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" \
  engine/train.py --config configs/smollm2-135m/general-simcse.yaml "model.adapters=[$mntp]" \
  eval_data=outputs/mntp-curve-general/sts-dev-interleaved.csv output_dir=$run progress_bar=false \
  model.gradient_checkpointing=false > "$run.log" 2>&1
t1=$(date +%s)
all=$(python -m engine.evaluate --model $run/adapter --task sts --data data/stsbenchmark/sts-test.csv 2>/dev/null | tail -1)
news=$(python -m engine.evaluate --model $run/adapter --task sts --data outputs/mntp-curve-general/holdout/sts-test.csv 2>/dev/null | tail -1)
python - "$all" "$news" "$((t1 - t0))" "$(git rev-parse --short HEAD)" > $here/simcse_on_step300.json <<'PY'
import json, sys, datetime
a, n = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(json.dumps({"date": datetime.date.today().isoformat(), "commit": sys.argv[4], "train_seconds": int(sys.argv[3]),
                  "mntp_adapter": "step 300 of curve.csv", "simcse": "configs/smollm2-135m/general-simcse.yaml, last adapter",
                  "test_spearman": round(a["spearman"], 2), "test_pairs": a["pairs"],
                  "news_spearman": round(n["spearman"], 2), "news_pairs": n["pairs"]}, indent=2))
PY
cat $here/simcse_on_step300.json

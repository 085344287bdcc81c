#!/usr/bin/env bash
# Re-take docs/images/mlflow-compare.png: the MLflow comparison view of the latest two runs,
# rendered by headless Chromium (Debian package `chromium`). Run from the project root after
# `make run`.
set -euo pipefail
PORT=${PORT:-5055}
export MLFLOW_DISABLE_TELEMETRY=true
setsid .venv/bin/mlflow ui --backend-store-uri "sqlite:///$PWD/mlflow.db" --host 127.0.0.1 --port "$PORT" >/dev/null 2>&1 &
server=$!
# `mlflow ui` leaves job-worker processes behind when only its main process is killed: stop the group.
trap 'kill -- -"$server" 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 1; done
runs=$(.venv/bin/python - <<'PY'
import json, mlflow
client = mlflow.tracking.MlflowClient("sqlite:///mlflow.db")
experiment = client.get_experiment_by_name("tumorseg")
runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=2)
print(json.dumps([r.info.run_id for r in runs]) + " " + json.dumps([experiment.experiment_id]))
PY
)
set -- $runs
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --window-size=1400,4200 \
  --virtual-time-budget=15000 --screenshot=/tmp/mlflow-compare-full.png \
  "http://127.0.0.1:$PORT/#/compare-runs?runs=$1&experiments=$2" >/dev/null 2>&1
.venv/bin/python -c "
import cv2
image = cv2.imread('/tmp/mlflow-compare-full.png')[0:2750, 0:1035]  # page body, without the assistant panel
cv2.imwrite('docs/images/mlflow-compare.png', cv2.resize(image, None, fx=0.6, fy=0.6, interpolation=cv2.INTER_AREA))"
echo "wrote docs/images/mlflow-compare.png"

#!/usr/bin/env bash
# Screenshot of a registered version's page in the MLflow UI, to check that its model card (the
# version's description, written by `soundmood register`) reads well in a real browser.
#
#   scripts/model_card_screenshot.sh [VERSION] [OUT.png]
#
#   VERSION  the version number of registry.model_name (default: the latest, via `soundmood
#            models --json`); MODEL=<name> picks another registered model
#   OUT.png  where the PNG goes (default: reports/model_card_v<VERSION>.png)
#
# Store: MLFLOW_TRACKING_URI if set, else sqlite:///mlflow.db (conf/tracking/default.yaml), run
# from the project root. The script starts `mlflow server` on 127.0.0.1 (PORT, default 5055) over
# that store, opens #/models/<name>/versions/<VERSION> in headless Chromium, writes the PNG and
# stops the server. It installs nothing: on Debian/Ubuntu, `apt-get install -y chromium` first
# (CHROMIUM=<path> names another binary). Not a CI test: a check to run and look at by eye.
set -euo pipefail

MODEL=${MODEL:-soundmood-fer}
PORT=${PORT:-5055}
STORE=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
MLFLOW=${MLFLOW:-$(command -v mlflow || echo .venv/bin/mlflow)}

if [[ -z "$CHROMIUM" ]]; then
    echo "error: no chromium found: apt-get install -y chromium (or set CHROMIUM=...)" >&2
    exit 2
fi
VERSION=${1:-}
if [[ -z "$VERSION" ]]; then
    SOUNDMOOD=$(command -v soundmood || echo .venv/bin/soundmood)
    VERSION=$(MLFLOW_TRACKING_URI=$STORE "$SOUNDMOOD" models --json | python3 -c \
        'import json, sys; print(max(v["version"] for v in json.load(sys.stdin)))')
fi
OUT=${2:-reports/model_card_v${VERSION}.png}
mkdir -p "$(dirname "$OUT")"

PROFILE_DIR=$(mktemp -d)
LOG=$(mktemp)
"$MLFLOW" server --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" --workers 1 \
    >"$LOG" 2>&1 &
SERVER=$!
cleanup() {
    kill "$SERVER" 2>/dev/null || true
    wait "$SERVER" 2>/dev/null || true
    rm -rf "$PROFILE_DIR" "$LOG"
}
trap cleanup EXIT

for _ in $(seq 120); do  # the first start creates or upgrades the store's tables: allow 60 s
    if curl -fs "http://127.0.0.1:$PORT/health" >/dev/null; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "error: mlflow server exited:" >&2
        cat "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done
curl -fs "http://127.0.0.1:$PORT/health" >/dev/null || { echo "error: mlflow server did not start" >&2; exit 1; }

URL="http://127.0.0.1:$PORT/#/models/$MODEL/versions/$VERSION"
# --virtual-time-budget lets the single-page app fetch the version and render before the shot.
"$CHROMIUM" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --user-data-dir="$PROFILE_DIR" \
    --virtual-time-budget=15000 --window-size=1400,2000 --screenshot="$OUT" "$URL" \
    2> >(grep -v -e 'dbus' -e 'Fontconfig' >&2 || true)
echo "wrote $OUT ($URL)"

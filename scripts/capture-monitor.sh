#!/usr/bin/env bash
# Captures what an operator sees: `sidecarless monitor` in a tmux pane while the billing-api requests run.
# Writes docs/monitor.txt. Run as root after `make setup`.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v tmux >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux
S=.venv/bin/sidecarless
LAB=monitor-demo
$S lab down --name "$LAB"
$S lab up --pods examples/billing-api/pods.yaml --policies examples/billing-api/policies-with-5432 --name "$LAB"
trap '$S lab down --name "$LAB"; tmux kill-session -t sidecarless-monitor 2>/dev/null || true' EXIT
tmux new-session -d -s sidecarless-monitor -x 200 -y 50 "$S monitor --lab $LAB"
sleep 1  # the monitor connects; nothing to wait on but its output
request() { $S lab exec --name "$LAB" "$1" -- curl -s -o /dev/null --connect-timeout 1 -X "$2" "http://billing-api:8080$3" || true; }
request prometheus GET /metrics
request prometheus POST /metrics
request finance-batch POST /api/v1/invoices/export
request finance-batch GET /metrics
request dev-tool GET /metrics
$S lab exec --name "$LAB" finance-batch -- sh -c 'echo hello | nc -N -w 1 billing-api 5432 >/dev/null'
$S lab exec --name "$LAB" dev-tool -- sh -c 'echo hello | nc -N -w 1 billing-api 5432 >/dev/null' || true
sleep 0.5
{
  echo "\$ sidecarless monitor --lab $LAB"
  tmux capture-pane -p -t sidecarless-monitor | sed -e '/^$/d'
} > docs/monitor.txt
cat docs/monitor.txt

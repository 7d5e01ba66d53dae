# Shared by the deployment scripts (sourced, from the repository root): Debian packages, the
# release binary, a temporary directory, stopping every process started here at exit, and
# starting Ballast on a config (as nobody when run as root: Ballast refuses to serve as root).
set -euo pipefail
bash scripts/deps.sh
swift build -c release --product ballast >/dev/null
ballast=.build/release/ballast
work=$(mktemp -d)
chmod 755 "$work"
pids=()
cleanup() {
    # TERM first (nginx's master stops its workers), then KILL what is left.
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 0.5
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# start_ballast CONFIG: checks it, runs it with its log in $work/ballast.log, waits for "started".
start_ballast() {
    local config="$work/ballast.yaml"
    cp "$1" "$config"
    if [ "$(id -u)" -eq 0 ]; then sed -i 's/^global:$/global:\n  user: nobody/' "$config"; fi
    $ballast check -c "$config" >/dev/null
    $ballast run -c "$config" 2>"$work/ballast.log" &
    pids+=($!)
    for _ in $(seq 50); do grep -q started "$work/ballast.log" && return; sleep 0.1; done
    echo "Ballast did not start:"; cat "$work/ballast.log"; exit 1
}

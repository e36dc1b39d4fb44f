# Sourced by scripts/gpu-ranks and scripts/gpu-multi: `step NAME TIMEOUT COMMAND...` runs the command under
# `timeout`, prints its output and keeps it in $out/NAME.log (the command line first), and counts a non-zero exit
# in $failed. A failing step does not stop the script.
failed=0
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S))"
    { echo "# $*"; timeout "$limit" "$@"; } 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    ((rc == 0)) || failed=$((failed + 1))
}

#!/usr/bin/env bash
# Checks that Cargo.lock holds versions with the known HTTP/2 fixes:
# h2 >= 0.4.18 (reset-flood protections) and tonic >= 0.14.3 (lets the
# server set h2's local-reset limit). Exits non-zero naming what is too old.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=${1:-Cargo.lock}
status=0

# Prints every version of package $1 in the lock file, one a line.
versions() {
    awk -v name="$1" '
        $0 == "[[package]]" { in_pkg = 1; pkg = ""; next }
        in_pkg && $1 == "name" { gsub(/"/, "", $3); pkg = $3 }
        in_pkg && $1 == "version" && pkg == name { gsub(/"/, "", $3); print $3 }
    ' "$lock"
}

# Whether version $1 >= version $2 (numeric, dot-separated).
at_least() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

require() {
    local name=$1 minimum=$2 found
    found=$(versions "$name")
    if [ -z "$found" ]; then
        echo "lock check: $name is not in $lock"
        status=1
        return
    fi
    for version in $found; do
        if at_least "$version" "$minimum"; then
            echo "lock check: $name $version (>= $minimum)"
        else
            echo "lock check: $name $version is older than $minimum"
            status=1
        fi
    done
}

require h2 0.4.18
require tonic 0.14.3
exit $status

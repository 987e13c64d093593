#!/bin/sh
# An ETL job as `vantage-sync run` wraps it (see README.md): it does its
# work, says how it went with its exit code, and writes its counts to the
# file that VANTAGE_SYNC_RESULT names. Without the wrapper that variable
# is unset and the job runs just the same.
#
#   sync-funds.sh [EXPORT.csv]
#
# The work is a stand-in for yours: it reads a CSV export of funds
# (id,name,status; status "new" or "changed") and counts the records.
# With no argument it reads a small sample.
set -eu

input=${1:-}

# Writes $1 to the result file, when run by the wrapper.
result() {
    if [ -n "${VANTAGE_SYNC_RESULT:-}" ]; then
        printf '%s\n' "$1" > "$VANTAGE_SYNC_RESULT"
    fi
}

sample() {
    cat <<'CSV'
id,name,status
f-1,Fund One,changed
f-2,Fund Two,changed
f-3,Fund Three,new
CSV
}

if [ -n "$input" ] && [ ! -r "$input" ]; then
    echo "sync-funds: cannot read $input" >&2
    # Errors written here are recorded with the failure, after the ones
    # the wrapper adds (the exit code, the end of standard error). The
    # message is fixed text: a file name could break the JSON.
    result '{"errors": [{"code": "INPUT_MISSING", "message": "the export file cannot be read"}]}'
    exit 1
fi

counts=$(
    if [ -n "$input" ]; then cat -- "$input"; else sample; fi |
        awk -F, 'NR > 1 && NF { synced++; if ($3 == "new") created++; else if ($3 == "changed") updated++ }
                 END { printf "%d %d %d", synced, created, updated }'
)
set -- $counts
synced=$1 created=$2 updated=$3

echo "sync-funds: $synced records, $created new, $updated changed"
result "{\"recordsSynced\": $synced, \"recordsCreated\": $created, \"recordsUpdated\": $updated}"

#!/bin/sh
# Seeds the fuzz corpora from the RFC 4475 torture messages (the corpus is never committed).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
src=${1:-$here/../../shared/testdata/rfc4475}
mkdir -p "$here/corpus/parse_message" "$here/corpus/parse_uri"
cp "$src"/*.dat "$here/corpus/parse_message/"
# URI seeds: Request-URIs and the values of From/To/Contact/Route lines of the same messages.
n=0
for f in "$src"/*.dat; do
    tr -d '\r' <"$f" | awk '
        NR == 1 && $0 !~ /^SIP\// { print $2 }
        /^(From|To|Contact|Route|Record-Route|f|t|m)[ \t]*:/ { sub(/^[^:]*:[ \t]*/, ""); print }
    ' | while IFS= read -r line; do
        [ -n "$line" ] || continue
        n=$((n + 1))
        printf '%s' "$line" >"$here/corpus/parse_uri/$(basename "$f" .dat)-$n"
    done
done
echo "seeded $(ls "$here/corpus/parse_message" | wc -l) messages, $(ls "$here/corpus/parse_uri" | wc -l) URI values"

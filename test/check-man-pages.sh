#!/bin/sh
# check-man-pages.sh PAYCOORD DOCS - the hand-written man pages name the
# daemon's version, paycoord(8) documents every option of `paycoord --help`,
# and man(1) formats each page without a warning (as lintian checks them).
set -eu
bin=$1 docs=$2
version=$("$bin" --version | sed -n 's/^paycoord \([^ ]*\).*/\1/p')
rc=0
for page in paycoord.8 paycoord-migrate.1 paycoordctl.1; do
    grep -q "^\.TH .* \"paycoord $version\" " "$docs/$page" ||
        { echo "$page: .TH does not name paycoord $version"; rc=1; }
done
for opt in $("$bin" --help | grep -o -- '--[a-z-]*' | sort -u); do
    sed 's/\\-/-/g' "$docs/paycoord.8" | grep -q -- "^\.[BI]R* *$opt\b\|[ \"]$opt\b" ||
        { echo "paycoord.8: option $opt of paycoord --help is not documented"; rc=1; }
done
if command -v man >/dev/null; then
    for page in "$docs"/*.[158]; do
        w=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$page" 2>&1 >/dev/null) || true
        [ -z "$w" ] || { echo "$page: man warnings:"; echo "$w"; rc=1; }
    done
fi
[ $rc -eq 0 ] && echo "check-man-pages: ok (paycoord $version)"
exit $rc

#!/usr/bin/env bash
# System tools some tests use: Debian's chromium (renders the HTML visual comparison headless) and
# pdflatex (compiles the LaTeX table). Installed with apt-get when missing and when this user can;
# otherwise those tests skip and say what to install. Never fails the test run.
cd "$(dirname "$0")/.."
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || missing+=(chromium)
command -v pdflatex >/dev/null 2>&1 || missing+=(texlive-latex-base texlive-latex-recommended)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing ${missing[*]} for the report tests (apt-get)"
  (timeout 900 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 900 \
    apt-get install -y -qq --no-install-recommends "${missing[@]}") >/dev/null 2>&1 \
    || echo "could not install ${missing[*]}: the browser/pdflatex report tests will skip"
else
  echo "not installing ${missing[*]} (needs root and apt-get): the browser/pdflatex report tests will skip"
fi
exit 0

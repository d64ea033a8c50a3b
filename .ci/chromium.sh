# Sourced by .ci/run: Debian's chromium and chromedriver for the browser test of the studio page
# (tests/test_ui_browser.py drives them with Selenium). Idempotent; needs root (CI runs as root).
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
echo "CI: $(chromium --version 2>/dev/null || echo 'chromium missing: the browser test will skip')"

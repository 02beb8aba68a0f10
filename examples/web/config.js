// The demo's settings. ./scripts/up.sh writes the real ones next to the page
// it serves; any of them can also be given in the page's URL fragment, as
// `#token=...&wallet=...&query_api=...&command_api=...`.
window.SOUK_DEMO = window.SOUK_DEMO || {};

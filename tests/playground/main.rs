//! The playground, without a browser: the page and its headers, the
//! WebSocket's origin check, its protocol driven as a page drives it (real
//! calls through the bridge, with their events), its limits, bad input,
//! TLS, and gRPC on the same port. `scripts/browser-tests.sh` clicks
//! through the page itself in headless Chromium.

mod bridge;
mod limits;
mod page;
mod ws;

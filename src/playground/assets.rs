//! The page's files, compiled into the binary: plain HTML, CSS and
//! JavaScript modules, no build step.

/// One file of the page.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    pub content_type: &'static str,
    pub body: &'static [u8],
}

macro_rules! asset {
    ($file:literal, $type:expr) => {
        Asset {
            content_type: $type,
            body: include_bytes!(concat!("assets/", $file)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";

/// The file served at `path`, if there is one.
pub fn find(path: &str) -> Option<Asset> {
    Some(match path {
        "/" | "/index.html" => asset!("index.html", HTML),
        "/style.css" => asset!("style.css", CSS),
        "/app.js" => asset!("app.js", JS),
        "/bridge.js" => asset!("bridge.js", JS),
        "/call.js" => asset!("call.js", JS),
        "/examples.js" => asset!("examples.js", JS),
        "/feed.js" => asset!("feed.js", JS),
        "/grpcurl.js" => asset!("grpcurl.js", JS),
        "/favicon.svg" => asset!("favicon.svg", "image/svg+xml"),
        _ => return None,
    })
}

//! `GET /playground`: the page for trying the gateway in a browser (CONTRACT §14), three
//! files embedded in the binary and served with a strict Content-Security-Policy.
//!
//! The policy allows scripts, styles and requests from the gateway's own origin only,
//! and no inline script or style, so the page cannot run anything it did not ship with.
//! The page talks to the OpenAI door like any client, with the key a person enters.

use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("playground/index.html");
const SCRIPT: &str = include_str!("playground/app.js");
const STYLE: &str = include_str!("playground/app.css");

/// Own origin only; nothing inline, no frames, no plugins, no forms posted elsewhere.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    // The files change with the binary: a browser revalidates rather than keep an old one.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The page.
pub async fn page() -> Response {
    file("text/html; charset=utf-8", PAGE)
}

/// Its script.
pub async fn script() -> Response {
    file("text/javascript; charset=utf-8", SCRIPT)
}

/// Its style sheet.
pub async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_no_inline_script_or_style_and_loads_only_its_own_files() {
        assert!(!PAGE.contains("<script>"), "inline script");
        assert!(!PAGE.contains("style="), "inline style");
        assert!(!PAGE.contains("<style"), "inline style element");
        let handlers = PAGE.split(" on").skip(1).filter(|rest| {
            let name: String = rest.chars().take_while(char::is_ascii_lowercase).collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert_eq!(handlers.count(), 0, "inline event handlers");
        assert!(
            !PAGE.contains("http://") && !PAGE.contains("https://"),
            "no CDN"
        );
        assert!(PAGE.contains(r#"<script src="/playground/app.js" defer>"#));
        assert!(PAGE.contains(r#"href="/playground/app.css""#));
        assert!(
            !SCRIPT.contains("localStorage"),
            "the key stays in session storage"
        );
        assert!(!SCRIPT.contains("eval(") && !SCRIPT.contains("innerHTML"));
    }

    #[test]
    fn every_form_control_has_a_label() {
        for id in ["api-key", "model", "stream", "prompt"] {
            assert!(
                PAGE.contains(&format!(r#"<label for="{id}">"#)),
                "no label for {id}"
            );
        }
    }
}

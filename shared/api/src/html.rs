//! The approval pages. Everything interpolated is HTML-escaped: an approval's message carries alert
//! text. The pages load nothing from anywhere and send no referrer.

use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use riposte_core::service::ApprovalView;

pub use riposte_core::expr::escape_markup as escape;

pub fn page(status: StatusCode, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"referrer\" content=\"no-referrer\">\
         <meta name=\"robots\" content=\"noindex\"><title>Riposte approval</title>\
         <style>body{{font-family:sans-serif;max-width:40em;margin:3em auto}}button{{font-size:1.2em;padding:.4em 1.2em}}</style>\
         </head><body>{body}</body></html>"
    );
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
            (
                header::HeaderName::from_static("content-security-policy"),
                "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            ),
            (header::HeaderName::from_static("x-frame-options"), "DENY"),
        ],
        html,
    )
        .into_response()
}

pub fn confirm(v: &ApprovalView) -> String {
    format!(
        "<h1>Confirm: {choice}</h1><p>{message}</p><p>Run <code>{run}</code> of playbook <code>{pb}</code>, step <code>{step}</code>.</p>\
         <form method=\"post\"><label>Your name or email (optional): <input name=\"approver\"></label><p>\
         <button type=\"submit\">Confirm {choice}</button></p></form>\
         <p><small>Opening this page decided nothing. Only the button does.</small></p>",
        choice = escape(&v.choice),
        message = escape(&v.message),
        run = escape(&v.run_id),
        pb = escape(&v.playbook_id),
        step = escape(&v.step),
    )
}

pub fn decided(v: &ApprovalView) -> String {
    let (choice, by) = v
        .decided
        .as_ref()
        .map(|d| (d.choice.as_str(), d.by.as_str()))
        .unwrap_or((v.choice.as_str(), ""));
    format!(
        "<h1>Recorded: {}</h1><p>Answered by {}. The playbook continues.</p>",
        escape(choice),
        escape(by)
    )
}

pub fn refused(message: &str) -> String {
    format!("<h1>Not recorded</h1><p>{}</p>", escape(message))
}

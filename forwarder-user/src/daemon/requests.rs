//! Control dispatch: requests from `forwarder rules` over the control
//! socket, read by a task per client and answered on the main loop, which
//! owns the rules.

use tokio::sync::{mpsc, oneshot};

use super::Daemon;
use crate::control::{self, Request, Response};

/// A request from a control-socket client, and where its answer goes.
pub(super) type Call = (Request, oneshot::Sender<Response>);

/// Reads the client's request on its own task and hands it to the main
/// loop; a slow or silent client never holds the loop up.
pub(super) fn serve_client(mut stream: tokio::net::UnixStream, calls: mpsc::Sender<Call>) {
    tokio::spawn(async move {
        let response = match control::read_request(&mut stream).await {
            Ok(request) => {
                let (tx, rx) = oneshot::channel();
                let _ = calls.send((request, tx)).await;
                rx.await
                    .unwrap_or_else(|_| Response::error("the daemon is stopping"))
            }
            Err(response) => response,
        };
        control::write_response(&mut stream, &response).await;
    });
}

impl Daemon {
    /// Carries out one request; every answer lists the rules as they are
    /// afterwards.
    pub(super) async fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::List => Ok(String::new()),
            Request::Add {
                spec,
                allow_from,
                expire_secs,
                comment,
                save,
            } => {
                self.add_rule(&spec, allow_from.as_deref(), expire_secs, comment, save)
                    .await
            }
            Request::Del { rule, save } => self.del_rule(&rule, save).await,
        };
        match result.and_then(|message| self.rule_views().map(|rules| (message, rules))) {
            Ok((message, rules)) => Response {
                ok: true,
                message: (!message.is_empty()).then_some(message),
                rules,
                error: None,
            },
            Err(error) => Response::error(error),
        }
    }

    /// The installed rules with what only the daemon knows: where each came
    /// from and its comment.
    fn rule_views(&self) -> Result<Vec<crate::rule_view::RuleView>, String> {
        let mut views = self
            .datapath
            .tables
            .rule_views()
            .map_err(|e| format!("{e:#}"))?;
        for view in &mut views {
            if let Some(rule) = self
                .config
                .rules
                .iter()
                .find(|r| r.proto.name() == view.proto && r.ports.first == view.port)
            {
                view.origin = Some(rule.origin);
                view.comment = rule.comment.clone();
            }
        }
        Ok(views)
    }
}

//! Control dispatch: requests from `forwarder rules` over the control
//! socket, read by a task per client and answered by the rule book's task,
//! which owns the rules.

use tokio::sync::{mpsc, oneshot};

use super::rule_changes::{Call, RuleBook};
use crate::control::{self, Request, Response};

/// Reads the client's request on its own task (at most
/// `control::MAX_REQUEST` bytes, within `control::CLIENT_TIMEOUT`) and
/// hands it to the rule book; a slow, silent or endless client holds up
/// nobody but itself.
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

impl RuleBook {
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
        let answer = match result {
            Ok(message) => self.rule_views().await.map(|rules| (message, rules)),
            Err(error) => Err(error),
        };
        match answer {
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
    async fn rule_views(&self) -> Result<Vec<crate::rule_view::RuleView>, String> {
        let mut views = self.jobs.views().await.map_err(|e| format!("{e:#}"))?;
        for view in &mut views {
            if let Some(rule) = self
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

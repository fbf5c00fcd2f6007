//! The Admin API's wire format, as qubesd speaks it on its socket
//! (qubes-core-admin `qubes/api/__init__.py`, `QubesDaemonProtocol`) and
//! qrexec relays it:
//!
//! - a call: `METHOD+ARG SOURCE name DEST` NUL, the payload, then EOF (the
//!   `+` is there even with no argument);
//! - a reply: `0` NUL and the body; or `2` NUL, the exception's type NUL,
//!   a traceback (empty unless qubesd debugs) NUL, its message NUL;
//! - `admin.Events` instead streams events, each `1` NUL, the subject (empty
//!   for the system itself) NUL, the event NUL, `KEY` NUL `VALUE` NUL pairs,
//!   and a closing NUL. The first is `connection-established`.

use std::fmt;

/// The longest reply accepted: qubesd's replies are a few KiB.
pub const MAX_REPLY: usize = 4 << 20;
/// The longest event accepted.
pub const MAX_EVENT: usize = 64 << 10;

/// What a call can end in besides a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// qubesd answered with an exception, e.g. `QubesFeatureNotFoundError`.
    Refused { kind: String, message: String },
    /// qubesd could not be reached, or its answer was not the protocol.
    Failed(String),
}

impl CallError {
    pub fn is(&self, kind: &str) -> bool {
        matches!(self, CallError::Refused { kind: k, .. } if k == kind)
    }
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Refused { kind, message } if message.is_empty() => {
                write!(f, "qubesd refused: {kind}")
            }
            CallError::Refused { kind, message } => write!(f, "qubesd refused: {kind}: {message}"),
            CallError::Failed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for CallError {}

/// The request qubesd reads from its socket, up to the payload. Source is
/// always dom0 there: the socket is dom0's, and qrexec adds the caller's
/// name itself.
pub fn request_header(method: &str, arg: &str, dest: &str) -> Vec<u8> {
    format!("{method}+{arg} dom0 name {dest}\0").into_bytes()
}

/// A whole reply: the body, or the exception qubesd raised.
pub fn parse_reply(bytes: &[u8]) -> Result<Vec<u8>, CallError> {
    let failed = |why: &str| CallError::Failed(format!("qubesd's reply {why}"));
    match bytes {
        [] => Err(failed("is empty (see journalctl in dom0)")),
        [b'0', 0, body @ ..] => Ok(body.to_vec()),
        [b'2', 0, rest @ ..] => {
            let mut fields = rest.split(|b| *b == 0);
            let kind = fields.next().unwrap_or_default();
            let _traceback = fields.next();
            let message = fields
                .next()
                .ok_or_else(|| failed("is a truncated exception"))?;
            let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
            Err(CallError::Refused {
                kind: text(kind),
                message: text(message),
            })
        }
        _ => Err(failed("does not start with 0 or 2")),
    }
}

/// One event of `admin.Events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The VM it is about; `None` for the system (domain-add, -delete).
    pub subject: Option<String>,
    pub name: String,
    pub kwargs: Vec<(String, String)>,
}

impl Event {
    pub fn kwarg(&self, key: &str) -> Option<&str> {
        self.kwargs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits the event stream into events as bytes arrive.
#[derive(Debug, Default)]
pub struct EventParser {
    buffer: Vec<u8>,
}

impl EventParser {
    /// Adds `bytes` and returns the events they complete. A non-event, or
    /// an event longer than [`MAX_EVENT`], ends the stream with an error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<Event>, CallError> {
        self.buffer.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some((event, used)) = Self::parse_one(&self.buffer)? {
            events.push(event);
            self.buffer.drain(..used);
        }
        if self.buffer.len() > MAX_EVENT {
            return Err(CallError::Failed(format!(
                "an event of more than {MAX_EVENT} bytes"
            )));
        }
        Ok(events)
    }

    /// Whether the stream ended between events.
    pub fn is_idle(&self) -> bool {
        self.buffer.is_empty()
    }

    /// The first complete event of `buffer` and its length.
    fn parse_one(buffer: &[u8]) -> Result<Option<(Event, usize)>, CallError> {
        let mut fields = Vec::new();
        let mut start = 0;
        for (i, b) in buffer.iter().enumerate() {
            if *b != 0 {
                continue;
            }
            let field = &buffer[start..i];
            start = i + 1;
            match fields.len() {
                0 if field == b"1" => {}
                0 => {
                    let text = String::from_utf8_lossy(field);
                    let why = if field == b"2" {
                        "an exception".to_string()
                    } else {
                        format!("{text:?}")
                    };
                    return Err(CallError::Failed(format!(
                        "non-event received on the events connection: {why}"
                    )));
                }
                // An empty key after the subject and name closes the event.
                n if n >= 3 && n % 2 == 1 && field.is_empty() => {
                    return Ok(Some((Self::event(&fields[1..]), start)));
                }
                _ => {}
            }
            fields.push(String::from_utf8_lossy(field).into_owned());
        }
        Ok(None)
    }

    /// `[subject, name, key, value, ...]` as an event.
    fn event(fields: &[String]) -> Event {
        let subject = Some(fields[0].clone()).filter(|s| !s.is_empty());
        let kwargs = fields[2..]
            .chunks(2)
            .map(|kv| (kv[0].clone(), kv[1].clone()))
            .collect();
        Event {
            subject,
            name: fields[1].clone(),
            kwargs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes qubesd's `send_event` writes.
    fn encode(event: &Event) -> Vec<u8> {
        let mut bytes = b"1\0".to_vec();
        for field in [event.subject.as_deref().unwrap_or(""), &event.name] {
            bytes.extend_from_slice(field.as_bytes());
            bytes.push(0);
        }
        for (key, value) in &event.kwargs {
            bytes.extend_from_slice(key.as_bytes());
            bytes.push(0);
            bytes.extend_from_slice(value.as_bytes());
            bytes.push(0);
        }
        bytes.push(0);
        bytes
    }

    #[test]
    fn requests_are_framed_as_qubesadmin_frames_them() {
        assert_eq!(
            request_header("admin.vm.feature.Set", "vm-config.forwarder.1", "sys-net"),
            b"admin.vm.feature.Set+vm-config.forwarder.1 dom0 name sys-net\0"
        );
        assert_eq!(
            request_header("admin.vm.List", "", "dom0"),
            b"admin.vm.List+ dom0 name dom0\0"
        );
    }

    #[test]
    fn replies_give_the_body_or_the_exception() {
        assert_eq!(
            parse_reply(b"0\0default=True type=vm sys-net"),
            Ok(b"default=True type=vm sys-net".to_vec())
        );
        assert_eq!(parse_reply(b"0\0"), Ok(Vec::new()));
        let err =
            parse_reply(b"2\0QubesFeatureNotFoundError\0\0Feature not set for domain app: x\0")
                .unwrap_err();
        assert!(err.is("QubesFeatureNotFoundError"));
        assert_eq!(
            err.to_string(),
            "qubesd refused: QubesFeatureNotFoundError: Feature not set for domain app: x"
        );
        assert_eq!(
            parse_reply(b"2\0PermissionDenied\0\0\0")
                .unwrap_err()
                .to_string(),
            "qubesd refused: PermissionDenied"
        );
        for bad in [&b""[..], b"1\0", b"0", b"2\0Type\0"] {
            assert!(
                matches!(parse_reply(bad), Err(CallError::Failed(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn events_are_parsed_across_arbitrary_reads() {
        let established = Event {
            subject: None,
            name: "connection-established".into(),
            kwargs: Vec::new(),
        };
        let netvm = Event {
            subject: Some("app".into()),
            name: "property-set:netvm".into(),
            kwargs: vec![
                ("name".into(), "netvm".into()),
                ("newvalue".into(), "sys-vpn".into()),
                ("oldvalue".into(), "".into()),
            ],
        };
        let stream = [encode(&established), encode(&netvm)].concat();
        assert_eq!(&stream[..26], b"1\0\0connection-established\0");
        for chunk in 1..stream.len() {
            let mut parser = EventParser::default();
            let mut events = Vec::new();
            for piece in stream.chunks(chunk) {
                events.extend(parser.feed(piece).unwrap());
            }
            assert_eq!(
                events,
                [established.clone(), netvm.clone()],
                "chunk {chunk}"
            );
            assert!(parser.is_idle());
        }
        assert_eq!(netvm.kwarg("newvalue"), Some("sys-vpn"));
        assert_eq!(netvm.kwarg("oldvalue"), Some(""));
    }

    #[test]
    fn a_non_event_or_an_endless_event_ends_the_stream() {
        let mut parser = EventParser::default();
        let err = parser.feed(b"2\0QubesException\0\0no\0").unwrap_err();
        assert!(err.to_string().contains("non-event"), "{err}");
        let mut parser = EventParser::default();
        let mut endless = b"1\0app\0".to_vec();
        endless.extend(std::iter::repeat_n(b'x', MAX_EVENT + 1));
        assert!(
            parser
                .feed(&endless)
                .unwrap_err()
                .to_string()
                .contains("more than")
        );
    }
}

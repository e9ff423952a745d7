//! Control requests: an operator asking one host's service to act now (`wnodesctl prefetch`),
//! as core NATS request/reply on `wnodes.ctl.<host token>.<service>.<verb>`
//! ([`subject::control_subject`]). They are not events: nothing is stored or replayed, a
//! request nobody hears is answered at once by the server's "no responders" status, and an
//! answer goes only to the requester's own inbox.
//!
//! A service takes its requests with [`serve`] and answers each through its [`Replier`], with
//! as many protobuf messages as it likes (a progress stream); a requester sends with
//! [`request`] and reads the answers from [`Replies`]. Answering needs the NATS `resp`
//! permission: a serving identity's JWT allows [`RESPONSE_MAX_MSGS`] answers per request within
//! [`RESPONSE_TTL`] (`wnodes-site`'s permissions), and no other publish.

use std::time::Duration;

use async_nats::{HeaderMap, StatusCode, Subject};
use bytes::Bytes;
use futures::StreamExt;
use prost::Message;

use crate::{
    bus::Bus,
    error::BusError,
    propagation,
    roles::{self, Role},
    subject,
};

/// How long after a request its server may still answer it (the `resp` permission's `ttl`).
pub const RESPONSE_TTL: Duration = Duration::from_secs(3600);
/// How many answers a server may send to one request (the `resp` permission's `max`).
pub const RESPONSE_MAX_MSGS: u32 = 4096;

/// The control subjects the identity of `role` on `host` serves (subscribes to and answers);
/// empty for a role that serves none.
pub fn served_subjects(role: &Role, host: Option<&str>) -> Result<Vec<String>, BusError> {
    match host {
        Some(h) if role.name == roles::IMAGE.name => Ok(vec![subject::image_prefetch_subject(h)?]),
        _ => Ok(Vec::new()),
    }
}

fn control_err(
    what: &'static str,
    subject: &str,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> BusError + use<> {
    let subject = subject.to_owned();
    move |source| BusError::Control {
        what,
        subject,
        source,
    }
}

/// The requests arriving on one control subject.
#[derive(Debug)]
pub struct Requests {
    sub: async_nats::Subscriber,
    client: async_nats::Client,
    subject: String,
}

/// Subscribes to `subject` to serve its requests; on return the server has the subscription.
pub async fn serve(bus: &Bus, subject: &str) -> Result<Requests, BusError> {
    let client = bus.client().clone();
    let sub = client
        .subscribe(subject.to_owned())
        .await
        .map_err(|e| control_err("subscribe to", subject)(Box::new(e)))?;
    client
        .flush()
        .await
        .map_err(|e| control_err("subscribe to", subject)(Box::new(e)))?;
    Ok(Requests {
        sub,
        client,
        subject: subject.to_owned(),
    })
}

impl Requests {
    /// The subject served.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The next request; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Request> {
        let msg = self.sub.next().await?;
        Some(Request {
            payload: msg.payload,
            headers: msg.headers,
            replier: msg.reply.map(|reply| Replier {
                client: self.client.clone(),
                reply,
            }),
        })
    }
}

/// One request: its body, its headers (the requester's trace context), and where to answer.
#[derive(Debug)]
pub struct Request {
    pub payload: Bytes,
    pub headers: Option<HeaderMap>,
    /// `None` when the requester gave no reply subject (nobody is listening).
    pub replier: Option<Replier>,
}

/// Answers one request on its reply subject; cheap to clone.
#[derive(Debug, Clone)]
pub struct Replier {
    client: async_nats::Client,
    reply: Subject,
}

impl Replier {
    /// Sends one answer (fire and forget: core NATS has no ack; a requester that stopped
    /// listening loses it).
    pub async fn send(&self, answer: &impl Message) -> Result<(), BusError> {
        self.client
            .publish(self.reply.clone(), Bytes::from(answer.encode_to_vec()))
            .await
            .map_err(|e| control_err("answer on", &self.reply)(Box::new(e)))
    }

    /// Sends buffered answers to the server now.
    pub async fn flush(&self) -> Result<(), BusError> {
        self.client
            .flush()
            .await
            .map_err(|e| control_err("flush the answers on", &self.reply)(Box::new(e)))
    }
}

/// What arrived in a requester's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// One answer's body.
    Answer(Bytes),
    /// The server's status: nobody subscribes to the request's subject.
    NoResponders,
}

/// The answers to one request.
#[derive(Debug)]
pub struct Replies {
    sub: async_nats::Subscriber,
}

/// Sends `body` to `subject` with a fresh reply inbox (under the identity's own inbox prefix)
/// and the current span's trace context, and returns that inbox's answers.
pub async fn request(bus: &Bus, subject: &str, body: &impl Message) -> Result<Replies, BusError> {
    let client = bus.client();
    let inbox = client.new_inbox();
    let sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| control_err("subscribe to the inbox for", subject)(Box::new(e)))?;
    let mut headers = HeaderMap::new();
    propagation::inject_current(&mut headers);
    client
        .publish_with_reply_and_headers(
            subject.to_owned(),
            inbox,
            headers,
            Bytes::from(body.encode_to_vec()),
        )
        .await
        .map_err(|e| control_err("send a request to", subject)(Box::new(e)))?;
    client
        .flush()
        .await
        .map_err(|e| control_err("send a request to", subject)(Box::new(e)))?;
    Ok(Replies { sub })
}

impl Replies {
    /// The next answer; `None` when the subscription ended (the connection closed).
    pub async fn next(&mut self) -> Option<Reply> {
        let msg = self.sub.next().await?;
        Some(if msg.status == Some(StatusCode::NO_RESPONDERS) {
            Reply::NoResponders
        } else {
            Reply::Answer(msg.payload)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_image_service_serves_and_only_its_own_host() {
        assert_eq!(
            served_subjects(&roles::IMAGE, Some("hv1.x")).unwrap(),
            ["wnodes.ctl.hv1_x.image.prefetch"]
        );
        for role in roles::ALL {
            if role.name != roles::IMAGE.name {
                assert!(served_subjects(role, Some("hv1.x")).unwrap().is_empty());
            }
        }
    }
}

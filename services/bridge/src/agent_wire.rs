//! The framing of the host agent's local protocol (`proto/wnodes/v1/agent.proto`): each
//! message is a 4-byte big-endian length followed by the encoded message, at most
//! [`MAX_FRAME`] bytes. Shared by `wnodes-bridge job-starter` and `wnodes-agent`.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The largest message either side accepts (an inline script, an output chunk).
pub const MAX_FRAME: usize = 16 << 20;

/// What can go wrong reading or writing a frame.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection failed")]
    Io(#[from] std::io::Error),
    #[error("a message of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLarge(usize),
    #[error("a message that does not decode")]
    Decode(#[from] prost::DecodeError),
}

/// Writes `msg` as one frame and flushes.
///
/// # Errors
/// The connection failing, or a message over [`MAX_FRAME`].
pub async fn write_msg<M: prost::Message>(
    w: &mut (impl AsyncWrite + Unpin),
    msg: &M,
) -> Result<(), WireError> {
    let body = msg.encode_to_vec();
    if body.len() > MAX_FRAME {
        return Err(WireError::TooLarge(body.len()));
    }
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge(body.len()))?;
    w.write_all(&len.to_be_bytes()).await?;
    w.write_all(&body).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer closed the connection between frames.
///
/// # Errors
/// The connection failing or closing inside a frame, a length over [`MAX_FRAME`], or bytes
/// that are not a `M`.
pub async fn read_msg<M: prost::Message + Default>(
    r: &mut (impl AsyncRead + Unpin),
) -> Result<Option<M>, WireError> {
    let mut len = [0u8; 4];
    // A close before the first byte is the end; after it, a cut frame.
    if r.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[1..]).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(M::decode(body.as_slice())?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use wnodes_bus::proto;

    #[tokio::test]
    async fn frames_round_trip_and_bad_frames_are_named() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        let msg = proto::AgentMessage {
            kind: Some(proto::agent_message::Kind::Progress("hello".into())),
        };
        write_msg(&mut a, &msg).await.unwrap();
        let got: proto::AgentMessage = read_msg(&mut b).await.unwrap().unwrap();
        assert_eq!(got, msg);
        // A length over the limit is refused before anything is allocated.
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let e = read_msg::<proto::AgentMessage>(&mut b).await.unwrap_err();
        assert!(e.to_string().contains("over the limit"), "{e}");
        // A clean close between frames is the end; inside a frame, an error.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0]).await.unwrap();
        drop(a);
        assert!(read_msg::<proto::AgentMessage>(&mut b).await.is_err());
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        assert!(
            read_msg::<proto::AgentMessage>(&mut b)
                .await
                .unwrap()
                .is_none()
        );
        // Bytes that are no message.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0, 0, 0, 2, 0xff, 0xff]).await.unwrap();
        let e = read_msg::<proto::AgentMessage>(&mut b).await.unwrap_err();
        assert!(matches!(e, WireError::Decode(_)), "{e}");
    }
}

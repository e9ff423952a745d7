//! Polling helper for conditions that become true "soon" (a consumer caught up, a span arrived).

use std::future::Future;
use std::time::Duration;

use anyhow::bail;

/// How often [`wait_until`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Poll `f` every 20 ms until it returns `Some(T)` or `timeout` passes; the error names `what`.
///
/// `f` is always called at least once, even with a zero timeout.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut attempts: u64 = 0;
    loop {
        attempts += 1;
        if let Some(value) = f().await {
            return Ok(value);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            bail!("timed out after {timeout:?} waiting for {what} ({attempts} attempts)");
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_once_the_condition_holds() {
        let n = Arc::new(AtomicU32::new(0));
        let got = wait_until(Duration::from_secs(5), "third call", || {
            let n = n.clone();
            async move {
                let v = n.fetch_add(1, Ordering::SeqCst) + 1;
                (v >= 3).then_some(v)
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 3);
    }

    #[tokio::test]
    async fn times_out_naming_what() {
        let err = wait_until(Duration::from_millis(60), "the impossible", || async {
            None::<()>
        })
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("the impossible"), "{msg}");
        assert!(msg.contains("timed out"), "{msg}");
    }
}

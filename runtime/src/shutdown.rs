//! Shutdown on SIGINT or SIGTERM.

use tokio::sync::watch;

/// Resolves when the process receives SIGINT (Ctrl-C) or SIGTERM.
pub async fn signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A [`Shutdown`] that fires on SIGINT or SIGTERM.
pub fn on_signal() -> Shutdown {
    let (trigger, shutdown) = channel();
    tokio::spawn(async move {
        signal().await;
        tracing::info!("shutting down");
        trigger.fire();
    });
    shutdown
}

/// A shutdown signal that many tasks can wait on.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

/// Triggers a [`Shutdown`].
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A connected trigger and signal.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// Resolves once the trigger fires (or is dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn is_fired(&self) -> bool {
        *self.0.borrow()
    }
}

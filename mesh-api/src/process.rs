//! Process lifecycle shared by the binaries.

/// Listens for SIGTERM (as Kubernetes sends) from the moment it is called, so that a signal
/// that comes while the process is still starting is not the default's immediate death; the
/// future resolves on SIGTERM or Ctrl-C. Call it inside the runtime, before starting.
pub fn termination() -> impl std::future::Future<Output = ()> {
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        let mut term = match term {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
}

/// Starts with `start` and holds what it made until SIGTERM (or Ctrl-C), listening before
/// `start` runs: a SIGTERM while starting (a controller waiting for its first sync) ends it at
/// once, with `Ok`. `start`'s error is returned as it is.
pub async fn serve_until_terminated<T, E>(
    start: impl std::future::Future<Output = Result<T, E>>,
) -> Result<(), E> {
    let terminated = termination();
    tokio::pin!(terminated);
    let running = tokio::select! {
        r = start => r?,
        () = &mut terminated => {
            tracing::info!("SIGTERM while starting: stopping");
            return Ok(());
        }
    };
    terminated.await;
    tracing::info!("shutting down");
    drop(running);
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C, listening from its first poll ([`termination`]).
pub async fn terminated() {
    termination().await;
}

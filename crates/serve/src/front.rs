//! One address in front of several servers (`dsv3 serve --expert-parallel --data-parallel`, a
//! server per process): each accepted connection goes to the next server in turn and its bytes
//! are relayed both ways, so HTTP, streaming and keep-alive pass through unchanged. Balancing is
//! per connection, as an L4 load balancer's: a client that keeps one connection stays on one
//! server.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};

/// Relays the connections `listener` accepts to `backends` (`host:port`) in turn; a server
/// that refuses a connection is skipped for that connection. Runs until dropped.
pub async fn round_robin(listener: TcpListener, backends: Vec<String>) {
    let backends = Arc::new(backends);
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let Ok((mut client, _)) = listener.accept().await else {
            // (Out of descriptors, say: wait rather than spin.)
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let (backends, next) = (backends.clone(), next.clone());
        tokio::spawn(async move {
            let first = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                if let Ok(mut server) = TcpStream::connect(backends[(first + i) % backends.len()].as_str()).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    return;
                }
            }
        });
    }
}

//! A gateway whose every connection runs a script the test writes: for behaviours too
//! particular for `gateway::Behaviour` (a pause of a given length, a reset or a GOAWAY
//! at a given moment). The listener's task and every connection end when it is dropped.

use std::{future::Future, net::SocketAddr, sync::Arc};

use rustls::ServerConfig;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

pub struct Scripted {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Scripted {
    /// Accepts on `listener`; after each handshake runs `script(n, stream)`, where `n`
    /// counts accepted connections from 0.
    pub fn start<F, Fut>(listener: TcpListener, tls: Arc<ServerConfig>, script: F) -> Scripted
    where
        F: Fn(usize, TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(tls);
        let script = Arc::new(script);
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            let mut n = 0;
            loop {
                while conns.try_join_next().is_some() {}
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, script) = (acceptor.clone(), script.clone());
                conns.spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        script(n, tls).await;
                    }
                });
                n += 1;
            }
        });
        Scripted { addr, task }
    }

    /// On a fresh listener on 127.0.0.1.
    pub async fn bind<F, Fut>(tls: Arc<ServerConfig>, script: F) -> Scripted
    where
        F: Fn(usize, TlsStream<tokio::net::TcpStream>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Scripted::start(listener, tls, script)
    }
}

//! After a short workload, every metric in the catalogue is exported.

mod support;

use support::gateway::{Behaviour, DEADLINE, Gateway, Runnel, exchange, pki, vars};

#[tokio::test]
async fn every_catalogue_metric_appears_in_metrics_after_a_workload() {
    let pki = pki();
    let gateway = Gateway::start(pki.gateway_tls(&[b"http/1.1"]).unwrap(), Behaviour::Echo).await;
    let mut runnel = Runnel::start(vars(&pki, gateway.addr)).await;
    exchange(runnel.addr, b"GET / HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let text = runnel.metrics().await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    for (name, kind, _, _) in runnel::metrics::CATALOGUE {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "{name} ({kind}) missing:\n{text}"
        );
    }
    assert!(
        text.contains("runnel_bytes_total{direction=\"to_upstream\"} 18"),
        "{text}"
    );
    runnel.stop();
    let _ = tokio::time::timeout(DEADLINE, &mut runnel.task).await;
}

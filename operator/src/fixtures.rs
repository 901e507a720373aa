//! Test fixtures: the example sale as the API server stores it, and a mocked
//! API server at the HTTP level (kube-rs/controller-rs `ApiServerVerifier`
//! style) whose test asserts each request in order.

use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::ObjectMeta;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

use crate::clock::ManualClock;
use crate::metrics::Metrics;
use crate::reconciler::{Context, Settings};
use crate::resource::{FlashSale, FlashSaleSpec};
use crate::served::ServedApis;

/// `examples/singles-day.yaml` with the metadata a stored object has.
pub fn sale() -> FlashSale {
    let value: serde_yaml::Value =
        match serde_yaml::from_str(include_str!("../../examples/singles-day.yaml")) {
            Ok(v) => v,
            Err(e) => panic!("example is YAML: {e}"),
        };
    let spec: FlashSaleSpec = match serde_yaml::from_value(value["spec"].clone()) {
        Ok(s) => s,
        Err(e) => panic!("example spec is a FlashSaleSpec: {e}"),
    };
    FlashSale {
        metadata: ObjectMeta {
            name: Some("singles-day".into()),
            namespace: Some("shop".into()),
            uid: Some("0b5a1c1e-0000-4000-8000-000000000001".into()),
            generation: Some(1),
            resource_version: Some("100".into()),
            ..Default::default()
        },
        spec,
        status: None,
    }
}

/// The example sale as it is after its first reconcile added the finalizer.
pub fn sale_with_finalizer() -> FlashSale {
    let mut s = sale();
    s.metadata.finalizers = Some(vec![crate::reconciler::FINALIZER.to_string()]);
    s
}

pub fn secret(name: &str, key: &str, value: &str) -> Value {
    let s = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..Default::default()
        },
        data: Some([(key.to_string(), ByteString(value.as_bytes().to_vec()))].into()),
        ..Default::default()
    };
    match serde_json::to_value(s) {
        Ok(v) => v,
        Err(e) => panic!("secret serializes: {e}"),
    }
}

pub fn not_found(what: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("{what} not found"),
        "reason": "NotFound", "code": 404
    })
}

pub fn settings() -> Settings {
    Settings {
        dataplane: crate::children::PodDefaults {
            image: "ghcr.io/flashsale/dataplane:test".into(),
            image_pull_secrets: Vec::new(),
        },
        refresh: Duration::from_secs(15),
        retry: Duration::from_secs(30),
        drain_timeout: Duration::from_secs(600),
    }
}

/// A context whose client talks to the returned mock API server.
pub fn context(clock: Arc<ManualClock>) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let reporter = Reporter {
        controller: "flashsale-operator".into(),
        instance: Some("test".into()),
    };
    let ctx = Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        clock,
        metrics: Arc::new(Metrics::default()),
        redis: Default::default(),
        stores: Default::default(),
        settings: settings(),
        // These tests' server serves policy/v1; discovery has its own tests.
        served: ServedApis::known(true),
        applied: Default::default(),
    };
    (Arc::new(ctx), ApiServer(handle))
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

pub struct ApiServer(Handle);

/// One request the code under test made, waiting for its answer.
pub struct Call {
    pub method: Method,
    pub uri: String,
    pub body: Value,
    send: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    pub fn respond(self, status: u16, body: &Value) {
        let bytes = match serde_json::to_vec(body) {
            Ok(b) => b,
            Err(e) => panic!("response serializes: {e}"),
        };
        let response = Response::builder().status(status).body(Body::from(bytes));
        match response {
            Ok(r) => self.send.send_response(r),
            Err(e) => panic!("response builds: {e}"),
        }
    }

    /// Answers with the request's own body, as an apply or create would.
    pub fn echo(self) {
        let body = self.body.clone();
        self.respond(200, &body);
    }

    /// Answers with a response built by the test (e.g. a body that is not JSON).
    pub fn send_raw(self, response: Response<Body>) {
        self.send.send_response(response);
    }
}

impl ApiServer {
    /// The next request; fails the test if none comes within five seconds.
    pub async fn call(&mut self) -> Call {
        let next = tokio::time::timeout(Duration::from_secs(5), self.next_call()).await;
        let Ok(Some(call)) = next else {
            panic!("expected another API request, none came");
        };
        call
    }

    /// The next request, however long it takes; `None` once the client is gone.
    pub async fn next_call(&mut self) -> Option<Call> {
        let (request, send) = self.0.next_request().await?;
        let method = request.method().clone();
        let uri = request.uri().to_string();
        let bytes = match request.into_body().collect_bytes().await {
            Ok(b) => b,
            Err(e) => panic!("request body: {e}"),
        };
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => panic!("request body is JSON: {e}"),
            }
        };
        Some(Call {
            method,
            uri,
            body,
            send,
        })
    }

    /// The next request, asserted to be `method uri`.
    pub async fn expect(&mut self, method: Method, uri: &str) -> Call {
        let call = self.call().await;
        assert_eq!(
            (&call.method, call.uri.as_str()),
            (&method, uri),
            "unexpected request; body: {}",
            call.body
        );
        call
    }

    /// A published Event: asserts its type, reason and note; returns it.
    pub async fn expect_event(&mut self, type_: &str, reason: &str, note: &str) -> Value {
        let call = self
            .expect(
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/shop/events?",
            )
            .await;
        assert_eq!(call.body["type"], json!(type_), "{}", call.body);
        assert_eq!(call.body["reason"], json!(reason), "{}", call.body);
        assert_eq!(call.body["note"], json!(note), "{}", call.body);
        assert_eq!(
            call.body["regarding"]["name"],
            json!("singles-day"),
            "{}",
            call.body
        );
        let body = call.body.clone();
        call.echo();
        body
    }
}

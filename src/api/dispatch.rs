//! The data plane's calls go straight to `keybroker.v1.KeyBroker`; every
//! other call (admin, health, reflection) goes through tonic's router.
//!
//! tonic routes by matching the path in an axum router, which stores the
//! match in the request's extensions, boxes and clones the chosen service
//! and converts the body twice: about 2,000 instructions and a dozen cache
//! lines per call, more than a cached unwrap costs. The generated
//! `KeyBrokerServer` matches its method names itself (an unknown one is
//! UNIMPLEMENTED, as from the router), so one prefix check replaces all of
//! that for the calls that are the product's hot path. The router keeps the
//! service too, so routing never depends on this layer being there.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::body::Body;

/// The path prefix of every `keybroker.v1.KeyBroker` method.
pub(crate) const DATA_PLANE_PREFIX: &str = "/keybroker.v1.KeyBroker/";

/// Sends calls under [`DATA_PLANE_PREFIX`] to `data_plane`, the rest to the
/// service it wraps (tonic's router).
#[derive(Debug, Clone)]
pub(crate) struct DataPlaneLayer<F> {
    data_plane: F,
}

impl<F> DataPlaneLayer<F> {
    pub(crate) fn new(data_plane: F) -> Self {
        Self { data_plane }
    }
}

impl<F: Clone, S> tower::Layer<S> for DataPlaneLayer<F> {
    type Service = DataPlaneFirst<F, S>;

    fn layer(&self, routed: S) -> Self::Service {
        DataPlaneFirst {
            data_plane: self.data_plane.clone(),
            routed,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DataPlaneFirst<F, S> {
    data_plane: F,
    routed: S,
}

type Answer = Result<http::Response<Body>, Infallible>;

impl<F, S> tower::Service<http::Request<Body>> for DataPlaneFirst<F, S>
where
    F: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = DataPlaneFuture<F::Future, Pin<Box<S::Future>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Either may take the next call, so both must be ready (tonic's
        // services always are).
        std::task::ready!(self.data_plane.poll_ready(cx))?;
        self.routed.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let future = if request.uri().path().starts_with(DATA_PLANE_PREFIX) {
            Dispatched::DataPlane {
                future: self.data_plane.call(request),
            }
        } else {
            // Boxed: the router's future is 320 bytes against the data
            // plane's 16, and an enum is as large as its largest variant.
            // Inline, every data-plane call's task would carry it (and the
            // allocator wipes each task's block when it is freed).
            Dispatched::Routed {
                future: Box::pin(self.routed.call(request)),
            }
        };
        DataPlaneFuture { future }
    }
}

pin_project_lite::pin_project! {
    /// The answer of whichever service took the call.
    pub(crate) struct DataPlaneFuture<A, B> {
        #[pin]
        future: Dispatched<A, B>,
    }
}

pin_project_lite::pin_project! {
    #[project = DispatchedProj]
    enum Dispatched<A, B> {
        DataPlane { #[pin] future: A },
        Routed { #[pin] future: B },
    }
}

impl<A, B> Future for DataPlaneFuture<A, B>
where
    A: Future<Output = Answer>,
    B: Future<Output = Answer>,
{
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match self.project().future.project() {
            DispatchedProj::DataPlane { future } => future.poll(cx),
            DispatchedProj::Routed { future } => future.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::server::NamedService;
    use tower::{Layer, Service, ServiceExt};

    use super::*;
    use crate::api::key_broker::KeyBrokerApi;
    use crate::proto::key_broker_server::KeyBrokerServer;

    #[test]
    fn the_prefix_is_the_generated_service_name() {
        assert_eq!(
            DATA_PLANE_PREFIX,
            format!(
                "/{}/",
                <KeyBrokerServer<KeyBrokerApi> as NamedService>::NAME
            )
        );
    }

    /// A service that answers with its own name in a header.
    fn named(
        name: &'static str,
    ) -> impl Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future = std::future::Ready<Answer>,
    > + Clone {
        tower::service_fn(move |_: http::Request<Body>| {
            let mut response = http::Response::new(Body::empty());
            response
                .headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static(name));
            std::future::ready(Ok(response))
        })
    }

    /// The router's future (320 bytes) is boxed: a data-plane call's
    /// future is the generated server's (a boxed future) and a tag.
    #[test]
    fn a_data_plane_call_carries_no_router_future() {
        type Routes = tonic::service::Routes;
        type DataPlane = KeyBrokerServer<KeyBrokerApi>;
        type Layered = DataPlaneFirst<DataPlane, Routes>;
        let routed = size_of::<<Routes as Service<http::Request<Body>>>::Future>();
        let layered = size_of::<<Layered as Service<http::Request<Body>>>::Future>();
        assert!(
            layered <= 32 && routed > layered,
            "the data plane's future is {layered} bytes (the router's {routed})"
        );
    }

    #[tokio::test]
    async fn data_plane_paths_skip_the_router_and_every_other_path_takes_it() {
        let mut service = DataPlaneLayer::new(named("data plane")).layer(named("router"));
        for (path, served_by) in [
            ("/keybroker.v1.KeyBroker/UnwrapKey", "data plane"),
            ("/keybroker.v1.KeyBroker/BatchUnwrapKey", "data plane"),
            // Unknown methods too: the generated server answers them
            // UNIMPLEMENTED, as the router would.
            ("/keybroker.v1.KeyBroker/NoSuchMethod", "data plane"),
            ("/keybroker.v1.KeyAdmin/ListKeys", "router"),
            ("/grpc.health.v1.Health/Check", "router"),
            ("/keybroker.v1.KeyBrokerX/UnwrapKey", "router"),
            ("/keybroker.v1.KeyBroker", "router"),
            ("/", "router"),
        ] {
            let request = http::Request::builder()
                .uri(path)
                .body(Body::empty())
                .expect("request");
            let response = service
                .ready()
                .await
                .expect("ready")
                .call(request)
                .await
                .expect("answer");
            assert_eq!(
                response.headers()["x-served-by"],
                served_by,
                "{path} went to the wrong service"
            );
        }
    }
}

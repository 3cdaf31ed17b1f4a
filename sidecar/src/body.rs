//! Bodies that meter what flows through them, and the end of a request.
//!
//! A request is over when its response body has been sent to the client (or
//! the client went away), not when the upstream answered: [`RequestEnd`]
//! records the request in its tenant's meter when it is dropped, and the
//! response body drops it at its end.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;

use crate::meter::{Clock, Finished, TenantMeter};
use crate::telemetry::Telemetry;

/// How billed duration is rounded: each request's duration is rounded up to
/// a whole number of `step`s, and to at least `minimum`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BilledDuration {
    pub step: Duration,
    pub minimum: Duration,
}

impl BilledDuration {
    pub fn of(&self, micros: u64) -> u64 {
        let step = u64::try_from(self.step.as_micros()).unwrap_or(u64::MAX).max(1);
        let minimum = u64::try_from(self.minimum.as_micros()).unwrap_or(u64::MAX);
        micros.div_ceil(step).saturating_mul(step).max(minimum)
    }
}

/// Records a request in its tenant's meter when dropped, exactly once.
#[derive(Debug)]
pub struct RequestEnd {
    meter: Arc<TenantMeter>,
    clock: Clock,
    /// When the request was let through to the upstream.
    started: u64,
    pub status: u16,
    pub error: bool,
    billing: BilledDuration,
    telemetry: &'static Telemetry,
    /// The concurrency slot the request holds, if the sidecar limits it.
    _permit: Option<OwnedSemaphorePermit>,
}

impl RequestEnd {
    pub fn new(
        meter: Arc<TenantMeter>,
        clock: Clock,
        started: u64,
        billing: BilledDuration,
        telemetry: &'static Telemetry,
        permit: Option<OwnedSemaphorePermit>,
    ) -> RequestEnd {
        RequestEnd {
            meter,
            clock,
            started,
            status: 0,
            error: false,
            billing,
            telemetry,
            _permit: permit,
        }
    }

    pub fn meter(&self) -> &Arc<TenantMeter> {
        &self.meter
    }
}

impl Drop for RequestEnd {
    fn drop(&mut self) {
        let now = self.clock.now();
        let duration_micros = now.saturating_sub(self.started);
        self.meter.finish(
            now,
            Finished {
                status: self.status,
                error: self.error,
                duration_micros,
                billed_duration_micros: self.billing.of(duration_micros),
            },
        );
        self.telemetry.observe_request(duration_micros);
    }
}

/// The client's request body on its way to the upstream, counted.
#[derive(Debug)]
pub struct RequestBody {
    inner: Incoming,
    meter: Arc<TenantMeter>,
}

impl RequestBody {
    pub fn new(inner: Incoming, meter: Arc<TenantMeter>) -> RequestBody {
        RequestBody { inner, meter }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.meter.add_bytes_in(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The upstream's response (or one the sidecar wrote) on its way to the
/// client, counted; ends the request when it ends.
#[derive(Debug)]
pub struct ResponseBody {
    inner: Either<Incoming, Full<Bytes>>,
    end: Option<RequestEnd>,
}

impl ResponseBody {
    pub fn upstream(inner: Incoming, end: Option<RequestEnd>) -> ResponseBody {
        ResponseBody {
            inner: Either::Left(inner),
            end,
        }
    }

    pub fn full(bytes: Bytes, end: Option<RequestEnd>) -> ResponseBody {
        ResponseBody {
            inner: Either::Right(Full::new(bytes)),
            end,
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(end)) = (frame.data_ref(), &self.end) {
                    end.meter().add_bytes_out(data.len() as u64);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(end) = self.end.as_mut() {
                    end.error = true;
                }
                self.end = None;
            }
            Poll::Ready(None) => self.end = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn billed_duration_rounds_up_to_the_step_and_minimum() {
        let lambda = BilledDuration {
            step: Duration::from_millis(1),
            minimum: Duration::ZERO,
        };
        assert_eq!(lambda.of(0), 0);
        assert_eq!(lambda.of(1), 1_000);
        assert_eq!(lambda.of(1_000), 1_000);
        assert_eq!(lambda.of(1_001), 2_000);
        let cloud_run = BilledDuration {
            step: Duration::from_millis(100),
            minimum: Duration::ZERO,
        };
        assert_eq!(cloud_run.of(100_001), 200_000);
        let azure = BilledDuration {
            step: Duration::from_millis(1),
            minimum: Duration::from_millis(100),
        };
        assert_eq!(azure.of(3_500), 100_000);
        assert_eq!(azure.of(150_500), 151_000);
    }
}

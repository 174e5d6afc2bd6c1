//! `GET /v1/models`: the models the calling key may use, in OpenAI's list shape.

use burncloud_core::GatewayError;
use burncloud_core::error::Protocol;
use bytes::Bytes;
use serde_json::json;

use crate::http::{Request, Responder};
use crate::relay::{self, RequestCtx};
use crate::state::Worker;

pub async fn list(worker: &Worker, req: Request, resp: &mut Responder<'_>) {
    let ctx = RequestCtx::new(worker, &req);
    match models_for(worker, &req).await {
        Ok(ids) => {
            let data: Vec<_> = ids
                .iter()
                .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "burncloud"}))
                .collect();
            let body = json!({"object": "list", "data": data}).to_string();
            let overhead = ctx.overhead_us().to_string();
            let headers = [
                ("content-type", "application/json"),
                ("x-request-id", ctx.id.as_str()),
                ("x-burncloud-overhead-us", overhead.as_str()),
            ];
            let _ = resp.send(200, &headers, Bytes::from(body)).await;
        }
        Err(e) => relay::respond_error(&ctx, resp, &e, Protocol::OpenAi).await,
    }
}

async fn models_for(worker: &Worker, req: &Request) -> Result<Vec<String>, GatewayError> {
    let caller = relay::authenticate(worker, req).await?;
    let snapshot = worker.shared.snapshot.load();
    let allowed = &caller.token.models;
    let models: std::collections::BTreeSet<&str> = relay::caller_groups(&caller, &snapshot)
        .into_iter()
        .flat_map(|group| snapshot.abilities.models(group))
        .filter(|m| allowed.is_empty() || allowed.iter().any(|a| a == m))
        .collect();
    Ok(models.into_iter().map(str::to_string).collect())
}

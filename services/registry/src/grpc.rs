//! `infermesh.v1.RegistryService` over [`Registry`].

use std::pin::Pin;

use futures::Stream;
use infermesh_proto::v1::registry_service_server::RegistryService;
use infermesh_proto::v1::{
    CatalogSnapshot, DeleteModelRequest, DeleteModelResponse, HeartbeatRequest, HeartbeatResponse, ListModelsRequest,
    ListModelsResponse, Model, PutModelRequest, RegisterWorkerRequest, RegisterWorkerResponse, ResolveModelRequest,
    WatchCatalogRequest,
};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::WatchStream;
use tonic::{Request, Response, Status};

use crate::error::RegistryError;
use crate::pool::Registry;

pub struct RegistryGrpc {
    registry: Registry,
}

impl RegistryGrpc {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    fn lease_ms(&self) -> u32 {
        u32::try_from(self.registry.lease().as_millis()).unwrap_or(u32::MAX)
    }
}

#[tonic::async_trait]
impl RegistryService for RegistryGrpc {
    async fn list_models(&self, _: Request<ListModelsRequest>) -> Result<Response<ListModelsResponse>, Status> {
        let models = self.registry.catalog(|c| c.models().to_vec());
        Ok(Response::new(ListModelsResponse { models }))
    }

    async fn resolve_model(&self, request: Request<ResolveModelRequest>) -> Result<Response<Model>, Status> {
        let ResolveModelRequest { name } = request.into_inner();
        let model = self.registry.catalog(|c| c.resolve(&name).cloned())?;
        Ok(Response::new(model))
    }

    async fn put_model(&self, request: Request<PutModelRequest>) -> Result<Response<Model>, Status> {
        let PutModelRequest { id, spec_json } = request.into_inner();
        let model = self.registry.put_model(&id, &spec_json).await?;
        tracing::info!(model = %id, "catalogue entry put");
        Ok(Response::new(model))
    }

    async fn delete_model(
        &self,
        request: Request<DeleteModelRequest>,
    ) -> Result<Response<DeleteModelResponse>, Status> {
        let DeleteModelRequest { id } = request.into_inner();
        self.registry.delete_model(&id).await?;
        tracing::info!(model = %id, "catalogue entry deleted");
        Ok(Response::new(DeleteModelResponse {}))
    }

    async fn register_worker(
        &self,
        request: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let RegisterWorkerRequest { worker_id, address, models } = request.into_inner();
        if worker_id.is_empty() || address.is_empty() {
            return Err(RegistryError::IncompleteWorker.into());
        }
        tracing::info!(%worker_id, %address, ?models, "worker registered");
        self.registry.register(&worker_id, &address, models);
        Ok(Response::new(RegisterWorkerResponse { lease_ms: self.lease_ms() }))
    }

    async fn heartbeat(&self, request: Request<HeartbeatRequest>) -> Result<Response<HeartbeatResponse>, Status> {
        let HeartbeatRequest { worker_id, load } = request.into_inner();
        let known = self.registry.heartbeat(&worker_id, load.unwrap_or_default());
        Ok(Response::new(HeartbeatResponse { known, lease_ms: self.lease_ms() }))
    }

    type WatchCatalogStream = Pin<Box<dyn Stream<Item = Result<CatalogSnapshot, Status>> + Send>>;

    async fn watch_catalog(
        &self,
        _: Request<WatchCatalogRequest>,
    ) -> Result<Response<Self::WatchCatalogStream>, Status> {
        let stream = WatchStream::new(self.registry.subscribe()).map(Ok);
        Ok(Response::new(Box::pin(stream)))
    }
}

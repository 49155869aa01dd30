pub mod allocate;
pub mod kube;
pub mod manifests;

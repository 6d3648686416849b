//! The mesh certificate authority: signs SPIFFE X.509 SVIDs for authenticated workloads; built
//! under the identity issue.

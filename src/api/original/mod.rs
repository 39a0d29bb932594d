//! The original door (CONTRACT §2): `POST /api/v1/chat` and `/v1/chat`, FastAPI's
//! `{"detail"}` errors and pydantic-style validation, exactly as the Python service had.

pub mod chat;
pub mod error;
pub mod schema;

pub use error::ApiError;

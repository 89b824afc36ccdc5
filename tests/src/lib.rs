
pub mod frames;

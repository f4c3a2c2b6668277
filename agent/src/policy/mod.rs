//! Policy decisions as plain functions over plain data: intentions ([`authz`]).

pub mod authz;

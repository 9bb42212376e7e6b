-- The demo schema, created in every region.
CREATE TABLE users (            -- local: personal data, never leaves its region
    id      bigint PRIMARY KEY,
    email   text NOT NULL,
    country text NOT NULL
);
CREATE TABLE products (         -- global: catalog, any region writes, last writer wins
    id    bigint PRIMARY KEY,
    name  text NOT NULL,
    price numeric(10,2) NOT NULL
);
CREATE TABLE currencies (       -- owned by us: read-only replica elsewhere
    code text PRIMARY KEY,
    rate numeric NOT NULL
);
CREATE TABLE orders (           -- partitioned by country: follows the residency policy
    id      bigint PRIMARY KEY,
    country text NOT NULL,
    email   text,
    card    text,
    amount  numeric(10,2) NOT NULL
);
